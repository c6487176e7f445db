// The Android demo as a Gradle build (open android_demo/ in Android Studio). CI does not run Gradle: ci.sh
// compiles and tests :core with kotlinc and checks :app's resources with aapt2 (see README.md).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "wisp-android-demo"
include(":core", ":app")
